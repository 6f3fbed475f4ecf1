"""The network box's pure parts: OVSDB framing, binding validation, interface XML, phases, store."""

from __future__ import annotations

import json
import os
import tempfile
import xml.etree.ElementTree as ET

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from quantix.errors import Invalid
from quantix.hypervisor import domainxml
from quantix.network import ports
from quantix.network.ovsdb import JsonSplitter, from_map, omap, scalar
from quantix.proto import node_pb2 as pb

VM = "4f1c2d3e-0000-4000-8000-000000000001"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


class SplitterTests(unittest.TestCase):
    def test_texts_back_to_back_in_one_feed(self):
        s = JsonSplitter()
        self.assertEqual(s.feed(b'{"a":1} [2]\n{"b":"}"}'), [b'{"a":1}', b"[2]", b'{"b":"}"}'])

    @settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
    @given(st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), min_size=1, max_size=4))
    def test_any_split_of_any_stream(self, messages):
        """Braces and quotes inside strings, escapes, and every cut point between feeds."""
        stream = b"".join(json.dumps(m).encode() for m in messages)
        for cut in range(0, len(stream) + 1, max(1, len(stream) // 17)):
            s = JsonSplitter()
            texts = s.feed(stream[:cut]) + s.feed(stream[cut:])
            self.assertEqual([json.loads(t) for t in texts], messages)

    def test_byte_at_a_time_with_escaped_quote(self):
        s = JsonSplitter()
        texts = []
        for byte in b'{"k":"a\\"}{\\\\"}':
            texts += s.feed(bytes([byte]))
        self.assertEqual([json.loads(t) for t in texts], [{"k": 'a"}{\\'}])

    def test_garbage_between_texts_is_an_error(self):
        with self.assertRaises(ValueError):
            JsonSplitter().feed(b'{"a":1} x')

    def test_oversized_text_is_an_error(self):
        s = JsonSplitter(limit=64)
        with self.assertRaises(ValueError):
            s.feed(b'{"a":"' + b"x" * 100)

    def test_value_helpers(self):
        self.assertEqual(from_map(omap({"b": "2", "a": "1"})), {"a": "1", "b": "2"})
        self.assertEqual(scalar(["set", []], "none"), "none")
        self.assertEqual(scalar(["set", ["up"]]), "up")
        self.assertEqual(scalar("up"), "up")


def request(**kw):
    base = {"port_id": "p1", "vm_id": VM, "mac_address": "52:54:00:AA:BB:CC", "ovn_port_name": "lsp-p1"}
    base.update(kw)
    return pb.ConfigureNetworkPortRequest(**base)


class BindingTests(unittest.TestCase):
    def test_valid_request(self):
        b = ports.binding_from_request(
            request(ip_addresses=["10.0.0.5", "fd00::5"], qos=pb.NetworkPortQoS(egress_rate_kbps=8000)),
            "br-int",
        )
        self.assertEqual(b.mac, "52:54:00:aa:bb:cc")
        self.assertEqual(b.ip_addresses, ("10.0.0.5", "fd00::5"))
        self.assertEqual(b.qos.egress_rate_kbps, 8000)

    def test_refusals_name_the_field(self):
        cases = {
            "mac_address": request(mac_address="52:54:00:zz:00:01"),
            "mac_address: MAC address is multicast": request(mac_address="01:00:5e:00:00:01"),
            "mac_address is required": request(mac_address=""),
            "ovn_port_name is required": request(ovn_port_name=""),
            "port_id is required": request(port_id=" "),
            "qos.ingress_rate_kbps": request(
                qos=pb.NetworkPortQoS(ingress_rate_kbps=ports.MAX_RATE_KBPS + 1)
            ),
            "qos.egress_burst_kb": request(qos=pb.NetworkPortQoS(egress_burst_kb=ports.MAX_BURST_KB + 1)),
            "needs qos.ingress_rate_kbps": request(qos=pb.NetworkPortQoS(ingress_burst_kb=10)),
            "MACVTAP": request(binding_type=pb.NETWORK_PORT_BINDING_MACVTAP),
            "VHOST_USER": request(binding_type=pb.NETWORK_PORT_BINDING_VHOST_USER),
            "ip_addresses": request(ip_addresses=["10.0.0.300"]),
            "forbidden character": request(ovn_port_name="lsp\x00x"),
        }
        for text, req in cases.items():
            with self.assertRaises(Invalid, msg=text) as cm:
                ports.binding_from_request(req, "br-int")
            self.assertIn(text.split()[0], str(cm.exception))

    def test_interface_xml(self):
        b = ports.binding_from_request(
            request(qos=pb.NetworkPortQoS(egress_rate_kbps=8000, egress_burst_kb=512, ingress_rate_kbps=100)),
            "br-ovn",
        )
        el = ET.fromstring(ports.interface_xml(b))
        self.assertEqual(el.get("type"), "bridge")
        self.assertEqual(el.find("source").get("bridge"), "br-ovn")
        self.assertEqual(el.find("virtualport").get("type"), "openvswitch")
        self.assertIsNone(el.find("virtualport/parameters"))  # not a UUID: the node binds it itself
        self.assertEqual(el.find("mac").get("address"), "52:54:00:aa:bb:cc")
        self.assertEqual(el.find("model").get("type"), "virtio")
        # egress (to the VM) is libvirt's inbound, in kB/s; ingress is policed by OVS instead
        self.assertEqual(el.find("bandwidth/inbound").attrib, {"average": "1000", "burst": "512"})
        self.assertIsNone(el.find("bandwidth/outbound"))

    def test_phases(self):
        self.assertEqual(ports.phase_of(None)[0], ports.PENDING)
        self.assertEqual(ports.phase_of({"link_state": "down", "external_ids": {}})[0], ports.DOWN)
        self.assertEqual(ports.phase_of({"link_state": "up", "external_ids": {}})[0], ports.BUILDING)
        installed = {"link_state": "up", "external_ids": {"ovn-installed": "true"}}
        self.assertEqual(ports.phase_of(installed)[0], ports.ACTIVE)

    def test_create_vm_xml_binds_the_nic(self):
        lsp = "0b6f7c3a-9a56-4e0b-8f0e-3f6f0d1d2c3b"  # a UUID-named port: libvirt binds it itself
        b = ports.binding_from_request(request(mac_address="52:54:00:00:00:07", ovn_port_name=lsp), "br-int")
        spec = pb.VMSpec(
            cpu_cores=1, memory_mib=64, nics=[pb.NicSpec(id="n0", mac_address="52:54:00:00:00:07")]
        )
        ctx = domainxml.DomainContext(
            vm_id=VM, name="v", agent_socket_dir="/tmp", bound_nics={b.mac: ports.nic_source(b)}
        )
        iface = ET.fromstring(domainxml.domain_xml(spec, ctx)).find("devices/interface")
        self.assertEqual(iface.get("type"), "bridge")
        self.assertEqual(iface.find("virtualport/parameters").get("interfaceid"), lsp)


class StoreTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, self.dir)

    def test_persists_across_instances(self):
        b = ports.binding_from_request(request(qos=pb.NetworkPortQoS(ingress_rate_kbps=5)), "br-int")
        ports.PortStore(self.dir).put(b)
        again = ports.PortStore(self.dir)
        self.assertEqual(again.get("p1"), b)
        self.assertEqual(list(again.sources_for(VM)), [b.mac])
        self.assertEqual(again.remove("p1"), b)
        self.assertIsNone(ports.PortStore(self.dir).get("p1"))
        self.assertIsNone(again.remove("p1"))

    def test_may_have_ports_answers_without_loading_or_locking(self):
        b = ports.binding_from_request(request(), "br-int")
        ports.PortStore(self.dir).put(b)
        store = ports.PortStore(self.dir)
        self.assertTrue(store.may_have_ports("any-vm"))  # not loaded yet: cannot tell
        store.all()
        self.assertTrue(store.may_have_ports(VM))
        self.assertFalse(store.may_have_ports("another-vm"))
        store.remove("p1")
        self.assertFalse(store.may_have_ports(VM))

    def test_unreadable_file_is_ignored_not_fatal(self):
        with open(os.path.join(self.dir, "network-ports.json"), "w") as fh:
            fh.write("{not json")
        self.assertEqual(ports.PortStore(self.dir).all(), [])
        self.flushLoggedErrors()
