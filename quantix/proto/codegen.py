"""Generate Python code from the ``.proto`` sources, keyed by a fingerprint of those sources.

Generated code is never committed. It lives in a directory named after the SHA-256 of every
``.proto`` file (path and bytes), so code generated from other sources can never be picked up:
a changed source means a new key, and a new key means the code is generated again (or, where
that is impossible, the daemon refuses to start and names the command that fixes it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

#: The proto files the daemon compiles, relative to the proto root.
PROTO_FILES = (
    "limiquantix/node/v1/node_daemon.proto",
    "limiquantix/agent/v1/agent.proto",
    "limiquantix/compute/v1/node_service.proto",
    "limiquantix/storage/v1/storage.proto",
)
#: Files that only carry messages (no service): no ``_pb2_grpc`` module is needed.
_GRPC_FILES = ("limiquantix/node/v1/node_daemon.proto",)
STAMP = "FINGERPRINT"
#: What the generated directory holds besides the modules; part of the key, so a cache made by
#: an older layout (without the type stubs) is never taken for a current one.
LAYOUT = b"python, grpc_python, mypy-protobuf stubs\n"
FIX_COMMAND = "quantix-proto --regenerate"


class ProtoError(Exception):
    """Generated code is missing or stale and cannot be produced here."""


def source_root() -> Path:
    """Where the ``.proto`` sources are: the checkout's ``proto/``, or the copy shipped inside."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "proto", here / "sources"):
        if (candidate / PROTO_FILES[0]).is_file():
            return candidate
    raise ProtoError(f"no .proto sources found beside {here}; reinstall the package")


def fingerprint(root: Path) -> str:
    """SHA-256 over every source's relative path and bytes, in a fixed order."""
    digest = hashlib.sha256(LAYOUT)
    for rel in PROTO_FILES:
        digest.update(rel.encode() + b"\0")
        digest.update((root / rel).read_bytes() + b"\0")
    return digest.hexdigest()


def cache_root() -> Path:
    """Base directory for generated code (``QUANTIX_PROTO_CACHE`` overrides)."""
    env = os.environ.get("QUANTIX_PROTO_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "quantix" / "proto"


def bundled_dir() -> Path:
    """Code generated at build time and shipped in the wheel."""
    return Path(__file__).resolve().parent / "_generated"


def is_current(out: Path, fp: str) -> bool:
    stamp = out / STAMP
    return stamp.is_file() and stamp.read_text().strip() == fp


def _plugin(directory: Path, name: str, function: str) -> str:
    """A protoc plugin script running mypy-protobuf with this interpreter (no PATH lookup: the
    build environment of a wheel has its own scripts directory)."""
    script = directory / f"protoc-gen-{name}"
    script.write_text(f"#!{sys.executable}\nfrom mypy_protobuf.main import {function}\n{function}()\n")
    script.chmod(0o700)
    return f"--plugin=protoc-gen-{name}={script}"


def generate(root: Path, out: Path) -> None:
    """Compile the sources into ``out`` atomically (build in a temp dir, then rename): the
    modules, the gRPC stubs, and mypy-protobuf's ``.pyi`` type stubs for both."""
    path_before = list(sys.path)
    try:
        import mypy_protobuf  # noqa: F401  (the stub plugin runs in a child process)
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - both are dependencies
        raise ProtoError(f"{exc.name} is not installed; install it and run `{FIX_COMMAND}`") from exc
    finally:
        sys.path[:] = path_before  # grpc_tools appends its include directory when imported
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=out.parent))
    plugins = Path(tempfile.mkdtemp(prefix=".plugins-", dir=out.parent))
    try:
        args = ["protoc", f"-I{root}", f"-I{include}", _plugin(plugins, "mypy", "main")]
        rc = protoc.main([*args, f"--python_out={tmp}", f"--mypy_out=quiet:{tmp}", *PROTO_FILES])
        if rc == 0:
            grpc_args = [f"--grpc_python_out={tmp}", _plugin(plugins, "mypy_grpc", "grpc")]
            rc = protoc.main([*args, *grpc_args, f"--mypy_grpc_out=quiet:{tmp}", *_GRPC_FILES])
        if rc != 0:
            raise ProtoError(f"protoc failed on {root} (exit {rc})")
        (tmp / STAMP).write_text(fingerprint(root) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(plugins, ignore_errors=True)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def locate(*, regenerate: bool = True) -> Path:
    """Return a directory holding code generated from the current sources.

    Prefers the build-time copy, then the fingerprint-keyed cache; generates into the cache
    when neither matches and ``regenerate`` is allowed.
    """
    root = source_root()
    fp = fingerprint(root)
    bundled = bundled_dir()
    if is_current(bundled, fp):
        return bundled
    cached = cache_root() / fp
    if is_current(cached, fp):
        return cached
    if not regenerate:
        raise ProtoError(f"generated protobuf code is stale or missing for {root}; run `{FIX_COMMAND}`")
    try:
        generate(root, cached)
    except OSError as exc:
        raise ProtoError(
            f"cannot generate protobuf code into {cached} ({exc.strerror}); run `{FIX_COMMAND}`"
        ) from exc
    return cached
