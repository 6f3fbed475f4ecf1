"""Concurrent power operations on one VM, and concurrent creates of one name, over real gRPC.

Each operation checks the VM's state and then acts; without per-VM serialisation two calls at
once act on a state the other is changing and fail INTERNAL ("domain is already running", "not
paused"). The documented idempotency must hold however many callers race: Start on a running VM,
Pause on a paused one, Stop on a stopped one are all OK.
"""

from __future__ import annotations

import collections
import threading
import uuid

import grpc
from google.protobuf import empty_pb2
from twisted.internet import defer, threads
from twisted.trial import unittest

from quantix.proto import node_pb2
from tests.support import Daemon

CALLERS = 12
ROUNDS = 6


def race(calls: list) -> collections.Counter:
    """Run the zero-argument ``calls`` at once (released together); count their status codes."""
    codes: collections.Counter = collections.Counter()
    details: list[str] = []
    start = threading.Barrier(len(calls))
    lock = threading.Lock()

    def run(call) -> None:
        start.wait()
        try:
            call()
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            with lock:
                details.append(f"{code.name}: {exc.details()}")
        with lock:
            codes[code] += 1

    threads_ = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join(60)
    codes["details"] = details  # type: ignore[assignment]
    return codes


class ConcurrentPowerTests(unittest.TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def setUp(self):
        self.daemon = yield Daemon(self, **{"server.max_workers": 64}).start()
        self.stub = self.daemon.stub

    def create(self, name: str | None = None) -> str:
        vm_id = str(uuid.uuid4())
        spec = node_pb2.VMSpec(cpu_cores=1, memory_mib=64)
        self.stub.CreateVM(
            node_pb2.CreateVMOnNodeRequest(vm_id=vm_id, name=name or f"race-{vm_id[:8]}", spec=spec)
        )
        return vm_id

    def same_op(self, method: str, vm_id: str) -> collections.Counter:
        request = (
            node_pb2.StopVMRequest(vm_id=vm_id) if method == "StopVM" else node_pb2.VMIdRequest(vm_id=vm_id)
        )
        return race([lambda: getattr(self.stub, method)(request, timeout=60)] * CALLERS)

    def test_each_power_op_is_idempotent_under_concurrency(self):
        def scenario():
            vm_id = self.create()
            for _ in range(ROUNDS):
                for method in ("StartVM", "PauseVM", "ResumeVM", "StopVM"):
                    codes = self.same_op(method, vm_id)
                    self.assertEqual(codes[grpc.StatusCode.OK], CALLERS, (method, codes["details"]))

        return threads.deferToThread(scenario)

    def test_mixed_power_ops_never_fail_internal(self):
        """Start, Pause, Resume, ForceStop and Reboot at once: each may find the wrong state, none
        may fail INTERNAL. (A graceful Stop of a VM another caller paused waits for its timeout.)"""

        def scenario():
            vm_id = self.create()
            req = node_pb2.VMIdRequest(vm_id=vm_id)
            ops = [
                lambda: self.stub.StartVM(req, timeout=60),
                lambda: self.stub.PauseVM(req, timeout=60),
                lambda: self.stub.ResumeVM(req, timeout=60),
                lambda: self.stub.ForceStopVM(req, timeout=60),
                lambda: self.stub.RebootVM(req, timeout=60),
            ]
            for _ in range(ROUNDS):
                codes = race(ops * 2)
                allowed = {grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION, "details"}
                self.assertLessEqual(set(codes), allowed, codes["details"])

        return threads.deferToThread(scenario)

    def test_creates_of_one_name_with_different_ids(self):
        def scenario():
            name = f"race-name-{uuid.uuid4().hex[:8]}"
            spec = node_pb2.VMSpec(cpu_cores=1, memory_mib=64)
            reqs = [
                node_pb2.CreateVMOnNodeRequest(vm_id=str(uuid.uuid4()), name=name, spec=spec)
                for _ in range(CALLERS)
            ]
            codes = race([lambda r=r: self.stub.CreateVM(r, timeout=60) for r in reqs])
            self.assertEqual(codes[grpc.StatusCode.OK], 1, codes["details"])
            self.assertEqual(codes[grpc.StatusCode.ALREADY_EXISTS], CALLERS - 1, codes["details"])
            listed = self.stub.ListVMs(empty_pb2.Empty(), timeout=60)
            self.assertEqual([vm.name for vm in listed.vms].count(name), 1)

        return threads.deferToThread(scenario)
