"""The QEMU guest agent through libvirt: commands, ping, and the agent install flow.

The test driver is real libvirt (its answer to ``qemuAgentCommand`` is "not supported", which
must read as ``available: false``); the guest side is the qemu-ga stand-in of ``tests.qgapeer``.
"""

from __future__ import annotations

import os

import libvirt
from twisted.trial import unittest

from quantix.hypervisor import qemuagent
from tests.qgapeer import QemuGuestAgentPeer
from tests.support import TEST_NODE_XML


class FakeClock:
    def __init__(self, step: float = 0.0) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class TestDriverTests(unittest.TestCase):
    def setUp(self):
        self.conn = libvirt.open(f"test://{TEST_NODE_XML}")
        self.addCleanup(self.conn.close)

    def test_ping_through_a_driver_without_qemu_agent_is_unavailable(self):
        dom = self.conn.lookupByName("vm-running")
        r = qemuagent.ping_result(dom)
        self.assertEqual(r["available"], False)
        self.assertIn("not supported", r["error"])

    def test_ping_of_a_stopped_vm_names_its_state(self):
        dom = self.conn.lookupByName("vm-stopped")
        self.assertEqual(
            qemuagent.ping_result(dom, run=QemuGuestAgentPeer()),
            {"available": False, "error": "VM is not running (state: shut off)"},
        )

    def test_ping_with_agent(self):
        peer = QemuGuestAgentPeer()
        dom = self.conn.lookupByName("vm-running")
        self.assertEqual(qemuagent.ping_result(dom, run=peer), {"available": True})
        self.assertEqual(peer.commands, [{"execute": "guest-ping"}])
        self.assertEqual(peer.timeouts, [5])
        peer.absent = True
        r = qemuagent.ping_result(dom, run=peer)
        self.assertFalse(r["available"])
        self.assertIn("not connected", r["error"])


class InstallTests(unittest.TestCase):
    def setUp(self):
        self.conn = libvirt.open(f"test://{TEST_NODE_XML}")
        self.addCleanup(self.conn.close)
        self.dom = self.conn.lookupByName("vm-running")
        self.peer = QemuGuestAgentPeer()
        self.binary = self.mktemp()
        self.payload = os.urandom(3 * qemuagent.CHUNK + 123)
        with open(self.binary, "wb") as fh:
            fh.write(self.payload)

    def test_copies_in_64k_chunks_and_starts_the_installer(self):
        r = qemuagent.install_agent(self.dom, self.binary, run=self.peer)
        self.assertTrue(r.success, r)
        self.assertEqual(r.method, "qemu-guest-agent")
        self.assertIn(f"{len(self.payload)} bytes", r.message)
        self.assertEqual(self.peer.files[qemuagent.AGENT_TMP], self.payload)
        self.assertEqual(self.peer.files[qemuagent.SCRIPT_PATH], qemuagent.INSTALL_SCRIPT.encode())
        writes = [c for c in self.peer.commands if c["execute"] == "guest-file-write"]
        self.assertEqual(len(writes), 5)  # 4 binary chunks + the script
        self.assertEqual(self.peer.execs, [("/bin/sh", [qemuagent.SCRIPT_PATH])])
        self.assertEqual(self.peer.open, {})  # every handle closed
        self.assertEqual(r.to_json()["success"], True)
        self.assertNotIn("error", r.to_json())

    def test_no_binary_configured_or_missing(self):
        r = qemuagent.install_agent(self.dom, None, run=self.peer)
        self.assertFalse(r.success)
        self.assertIn("agent.binary_path", r.error)
        r = qemuagent.install_agent(self.dom, "/nonexistent/agent", run=self.peer)
        self.assertIn("/nonexistent/agent", r.error)
        self.assertEqual(self.peer.commands, [])

    def test_no_qemu_agent(self):
        self.peer.absent = True
        r = qemuagent.install_agent(self.dom, self.binary, run=self.peer)
        self.assertFalse(r.success)
        self.assertIn("not connected", r.error)
        self.assertEqual(r.to_json()["error"], r.error)

    def test_exec_blocked_by_guest_policy_says_manual(self):
        self.peer.blocked.add("guest-exec")
        r = qemuagent.install_agent(self.dom, self.binary, run=self.peer)
        self.assertFalse(r.success)
        self.assertEqual(r.method, "manual")
        self.assertIn("disabled", r.error)

    def test_short_write_fails_and_closes_the_file(self):
        self.peer.short_write = True
        r = qemuagent.install_agent(self.dom, self.binary, run=self.peer)
        self.assertFalse(r.success)
        self.assertIn("short write", r.error)
        self.assertEqual(self.peer.open, {})

    def test_deadline_bounds_the_copy(self):
        clock = FakeClock(step=1.0)  # every clock read is one second later
        r = qemuagent.install_agent(self.dom, self.binary, run=self.peer, deadline_seconds=4, clock=clock)
        self.assertFalse(r.success)
        self.assertIn("within 4 s", r.error)
        self.assertEqual(self.peer.open, {})
        self.assertTrue(all(t <= qemuagent.COMMAND_TIMEOUT for t in self.peer.timeouts))

    def test_not_running(self):
        dom = self.conn.lookupByName("vm-stopped")
        r = qemuagent.install_agent(dom, self.binary, run=self.peer)
        self.assertIn("not running", r.error)


class CommandTests(unittest.TestCase):
    def test_garbage_and_odd_replies_are_errors(self):
        for reply in ("not json", "[1, 2]", '{"error": "x"}'):
            agent = qemuagent.QemuAgent(object(), run=lambda d, c, t, reply=reply: reply)
            with self.assertRaises(qemuagent.QemuAgentError):
                agent.command("guest-ping")

    def test_exec_without_pid(self):
        agent = qemuagent.QemuAgent(object(), run=lambda d, c, t: '{"return": {}}')
        with self.assertRaises(qemuagent.QemuAgentError):
            agent.exec("/bin/true", [])

    def test_none_reply(self):
        agent = qemuagent.QemuAgent(object(), run=lambda d, c, t: None)
        self.assertIsNone(agent.command("guest-ping"))
