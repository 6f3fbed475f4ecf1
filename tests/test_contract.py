"""The compiled .proto files are wire-identical to the contract facts in tests/contract/.

The JSON files are copies of the shared wire contract; the summary below is computed from the
descriptors the daemon actually loads, so a drift in either the sources or the generated code
fails here.
"""

from __future__ import annotations

import json
import os

from google.protobuf import descriptor as d
from google.protobuf.descriptor_pb2 import FieldDescriptorProto as FDP
from twisted.trial import unittest

from quantix.proto import agent_pb2, compute_pb2, node_pb2, storage_pb2

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "contract")

_TYPE = {v: k[5:].lower() for k, v in FDP.Type.items()}
_LABEL = {v: k[6:].lower() for k, v in FDP.Label.items()}


def _field(f: d.FieldDescriptor) -> dict:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        out = {"number": f.number, "type": "map", "key": _TYPE[key.type], "value": _TYPE[value.type]}
        sub = value.message_type or value.enum_type
        if sub is not None:
            out["value_type_name"] = sub.full_name
        return out
    label = "repeated" if f.is_repeated else ("required" if f.is_required else "optional")
    out = {"number": f.number, "type": _TYPE[f.type], "label": label}
    sub = f.message_type or f.enum_type
    if sub is not None:
        out["type_name"] = sub.full_name
    oneof = f.containing_oneof
    if oneof is not None and f.has_presence and len(oneof.fields) == 1 and oneof.name == "_" + f.name:
        out["optional"] = True
    elif oneof is not None:
        out["oneof"] = oneof.name
    return out


def summarise(fd: d.FileDescriptor) -> dict:
    """Services, messages (nested included) and enums of one file, in the contract's format."""
    out: dict = {"messages": {}, "enums": {}, "services": {}}

    def walk(msg: d.Descriptor) -> None:
        if msg.GetOptions().map_entry:
            return
        out["messages"][msg.full_name] = {f.name: _field(f) for f in msg.fields}
        for nested in msg.nested_types:
            walk(nested)
        for enum in msg.enum_types:
            out["enums"][enum.full_name] = {v.name: v.number for v in enum.values}

    for msg in fd.message_types_by_name.values():
        walk(msg)
    for enum in fd.enum_types_by_name.values():
        out["enums"][enum.full_name] = {v.name: v.number for v in enum.values}
    for svc in fd.services_by_name.values():
        out["services"][svc.full_name] = {
            m.name: {
                "input": m.input_type.full_name,
                "output": m.output_type.full_name,
                "client_streaming": m.client_streaming,
                "server_streaming": m.server_streaming,
            }
            for m in svc.methods
        }
    return out


def _load(name: str) -> dict:
    with open(os.path.join(HERE, name)) as fh:
        return json.load(fh)


class ContractTests(unittest.TestCase):
    def test_node_daemon_exact(self):
        ours = summarise(node_pb2.DESCRIPTOR)
        self.assertEqual(ours, _load("node-daemon.json"))
        self.assertEqual(len(ours["services"]["limiquantix.node.v1.NodeDaemonService"]), 57)

    def test_agent_exact(self):
        self.assertEqual(summarise(agent_pb2.DESCRIPTOR), _load("agent-v1.json"))

    def test_compute_storage_subset(self):
        facts = _load("cp-compute-storage.json")
        for module in (compute_pb2, storage_pb2):
            ours = summarise(module.DESCRIPTOR)
            self.assertTrue(ours["messages"])
            for kind in ("messages", "enums"):
                for name, value in ours[kind].items():
                    self.assertIn(name, facts[kind])
                    self.assertEqual(value, facts[kind][name], name)
            for svc, methods in ours["services"].items():
                for method, shape in methods.items():
                    self.assertEqual(shape, facts["services"][svc][method], f"{svc}/{method}")

    def test_summary_detects_a_difference(self):
        """The comparison is not vacuous: a renumbered field is caught."""
        facts = _load("node-daemon.json")
        facts["messages"]["limiquantix.node.v1.NodeEvent"]["vm_id"]["number"] = 99
        self.assertNotEqual(summarise(node_pb2.DESCRIPTOR), facts)
