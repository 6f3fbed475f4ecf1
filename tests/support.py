"""Shared test harness: a real daemon (NodeService) in the trial reactor, a real grpc client."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any, NoReturn

import grpc
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from quantix import config as cfg
from quantix.errors import HypervisorDown
from quantix.node import NodeService
from quantix.proto import node_grpc

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_NODE_XML = os.path.join(HERE, "fixtures", "node.xml")


def test_config(tmp: str, **overrides: Any) -> cfg.Config:
    """A config rooted in ``tmp``: ephemeral port, private test-driver host, no metrics port."""
    values = {
        "listen_address": ("127.0.0.1:0", "test"),
        "state_dir": (os.path.join(tmp, "state"), "test"),
        "hypervisor.uri": (f"test://{TEST_NODE_XML}", "test"),
        "agent.socket_dir": (os.path.join(tmp, "agents"), "test"),
        "storage.root": (os.path.join(tmp, "storage"), "test"),
        "storage.vm_images": (os.path.join(tmp, "storage", "vms"), "test"),
        "storage.cloud_images": (os.path.join(tmp, "storage", "cloud-images"), "test"),
        "storage.iso_images": (os.path.join(tmp, "storage", "isos"), "test"),
        "server.metrics_listen": (None, "test"),
        "ovs.db_socket": (os.path.join(tmp, "ovs", "db.sock"), "test"),
        "http.listen": (None, "test"),
        "https.listen": (None, "test"),
        "server.max_workers": (32, "test"),
        "server.grace_seconds": (0.5, "test"),
    }
    values.update({k: (v, "test") for k, v in overrides.items()})
    return cfg.build(values)


class Daemon:
    """Start a NodeService on an ephemeral port; ``stub`` is a grpc client bound to it."""

    def __init__(self, testcase: Any, **overrides: Any) -> None:
        self.tmp = tempfile.mkdtemp(prefix="qtx-")
        testcase.addCleanup(_rmtree, self.tmp)
        self.config = test_config(self.tmp, **overrides)
        self.node = NodeService(self.config, reactor)
        self.channel: grpc.Channel | None = None
        self.stub: Any = None
        self._testcase = testcase

    @defer.inlineCallbacks
    def start(self, wait_connected: bool = True):
        self.node.startService()
        self._testcase.addCleanup(self.stop)
        self.address = f"127.0.0.1:{self.node.grpc.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = node_grpc.NodeDaemonServiceStub(self.channel)
        if wait_connected:
            yield wait_for(lambda: self.node.hypervisor.connected)
        return self

    def call(self, method: str, request: Any, **kwargs: Any) -> defer.Deferred:
        """Blocking grpc call in a thread, so the reactor keeps running the daemon."""
        return threads.deferToThread(getattr(self.stub, method), request, **kwargs)

    @defer.inlineCallbacks
    def stop(self):
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.node.running:
            yield self.node.stopService()


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@defer.inlineCallbacks
def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01):
    """Poll ``predicate`` on the reactor until true; fails the test after ``timeout``."""
    from twisted.internet import task

    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        yield task.deferLater(reactor, interval, lambda: None)
        waited += interval


def rpc_error(d: defer.Deferred) -> defer.Deferred:
    """Turn a grpc.RpcError result into ``(code, details)``; a success fails the test."""

    def ok(result):
        raise AssertionError(f"expected an RPC error, got {result!r}")

    def err(failure):
        failure.trap(grpc.RpcError)
        return failure.value.code(), failure.value.details()

    return d.addCallbacks(ok, err)


def storage_dir(daemon: Daemon) -> str:
    """The daemon's storage root, created: files a request names must lie in a storage location."""
    os.makedirs(daemon.config.storage.root, exist_ok=True)
    return daemon.config.storage.root


class DatagramSink:
    """A bound AF_UNIX datagram socket: what systemd's notify socket or journald's socket is."""

    def __init__(self, testcase: unittest.TestCase, name: str = "notify") -> None:
        # Short path: sun_path is limited to 108 bytes, trial's temp dirs can be longer.
        self.dir = tempfile.mkdtemp(prefix="qtx-ops-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, name)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        testcase.addCleanup(self.sock.close)
        self.received: list[bytes] = []

    def drain(self) -> list[bytes]:
        """Everything queued right now (never blocks)."""
        got = []
        while True:
            try:
                got.append(self.sock.recv(1 << 20))
            except BlockingIOError:
                break
        self.received.extend(got)
        return got

    def messages(self) -> list[str]:
        self.drain()
        return [m.decode() for m in self.received]

    def count(self, line: str) -> int:
        return sum(line in m.splitlines() for m in self.messages())


class NoLibvirt:
    """A hypervisor box whose libvirt is away (agent RPC tests): an unknown VM is then reported
    as "no agent"."""

    uri = "test:///default"
    identity = None
    connected = False

    def conn(self) -> NoReturn:
        raise HypervisorDown()
