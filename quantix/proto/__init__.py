"""The wire contract as Python modules, generated from ``proto/`` on demand.

``from quantix.proto import node_pb2`` always yields code generated from the sources that sit
beside this package (see :mod:`quantix.proto.codegen`); stale code is never imported.

Importing this package does nothing by itself: the first access to one of the module names
below finds (or generates) the code and loads it with :mod:`importlib`. ``sys.path`` is never
changed; the generated code's top package ``limiquantix`` is registered in ``sys.modules`` with
its ``__path__`` pointing into the generated directory, which is what the absolute imports
between generated modules need.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from quantix.proto.codegen import ProtoError, locate

if TYPE_CHECKING:  # the stubs mypy-protobuf generated beside the code (see .ci/run's MYPYPATH)
    from limiquantix.agent.v1 import agent_pb2 as agent_pb2
    from limiquantix.compute.v1 import node_service_pb2 as compute_pb2
    from limiquantix.node.v1 import node_daemon_pb2 as node_pb2
    from limiquantix.node.v1 import node_daemon_pb2_grpc as node_grpc
    from limiquantix.storage.v1 import storage_pb2 as storage_pb2

__all__ = ["ProtoError", "agent_pb2", "compute_pb2", "generated_dir", "node_grpc", "node_pb2", "storage_pb2"]

#: Our short names for the generated modules.
MODULES = {
    "node_pb2": "limiquantix.node.v1.node_daemon_pb2",
    "node_grpc": "limiquantix.node.v1.node_daemon_pb2_grpc",
    "agent_pb2": "limiquantix.agent.v1.agent_pb2",
    "compute_pb2": "limiquantix.compute.v1.node_service_pb2",
    "storage_pb2": "limiquantix.storage.v1.storage_pb2",
}
_TOP = "limiquantix"
_lock = threading.Lock()


def generated_dir() -> Path:
    """The directory the generated modules are loaded from (found or generated on first use)."""
    with _lock:
        top = sys.modules.get(_TOP)
        if top is None:
            top = _register_top(locate())
        return Path(next(iter(top.__path__))).parent


def _register_top(directory: Path) -> ModuleType:
    spec = importlib.machinery.ModuleSpec(_TOP, None, is_package=True)
    spec.submodule_search_locations = [str(directory / _TOP)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[_TOP] = module
    return module


def __getattr__(name: str) -> ModuleType:
    target = MODULES.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    generated_dir()
    module = importlib.import_module(target)
    globals()[name] = module
    return module
