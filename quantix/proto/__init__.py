"""The wire contract as Python modules, generated from ``proto/`` on demand.

``from quantix.proto import node_pb2`` always yields code generated from the sources that sit
beside this package (see :mod:`quantix.proto.codegen`); stale code is never imported.
"""

from __future__ import annotations

import importlib
import sys

from quantix.proto.codegen import ProtoError, locate

__all__ = ["ProtoError", "agent_pb2", "compute_pb2", "node_grpc", "node_pb2", "storage_pb2"]

_dir = str(locate())
if _dir not in sys.path:
    sys.path.insert(0, _dir)

node_pb2 = importlib.import_module("limiquantix.node.v1.node_daemon_pb2")
node_grpc = importlib.import_module("limiquantix.node.v1.node_daemon_pb2_grpc")
agent_pb2 = importlib.import_module("limiquantix.agent.v1.agent_pb2")
compute_pb2 = importlib.import_module("limiquantix.compute.v1.node_service_pb2")
storage_pb2 = importlib.import_module("limiquantix.storage.v1.storage_pb2")
